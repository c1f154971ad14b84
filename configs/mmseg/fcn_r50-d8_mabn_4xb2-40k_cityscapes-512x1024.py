# mmsegmentation's FCN R50-D8 on Cityscapes with ConvWC + MABN (backbone, decode head and
# auxiliary head) at its 2 images per GPU: buffer_size=16 is the MABN paper's rule (a
# simulated batch of 32 over 2 images). Needs the optional extra: pip install -e '.[mmseg]'.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg, norm_eval=False),
    decode_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg))
