# mmsegmentation's FCN R50-D8 on Cityscapes with ConvWC + MABN (backbone, decode head and
# auxiliary head) at its 2 images per GPU, on the detection recipe of docs/mabn.md as far
# as it carries over: buffer_size=16 is the MABN paper's rule (a simulated batch of 32
# over 2 images), r_max=5, momentum=0.02 (PyTorch's sense). The recipe starts the moving
# averages at 4x the learning-rate warm-up; mmseg's 40k schedule has none (PolyLR from
# iteration 0), so warmup_iters = renorm_iters = 2000 are the COCO detection configs'
# value, not measured here: the layer's default would start them at iteration 100, the
# early start that spiked the gradient on the toy detector (study row `mabn2`). Both
# heads run once per iteration (no per-level factor).
# Needs the optional extra: pip install -e '.[mmseg]'.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16, warmup_iters=2000,
                renorm_iters=2000, r_max=5.0, momentum=0.02)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg, norm_eval=False),
    decode_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg))
