# RetinaNet R-50 FPN 1x on COCO (data/coco/) with ConvWC + MABN in the backbone (trained,
# norm_eval=False), the FPN and a normed head with per-level statistics
# (LevelNormRetinaHead: the head's convs shared across the 5 levels, one MABN per level),
# at mmdet's 2 images per GPU: the placement of the toy study's best MABN row,
# `mabn2_all_lvl_late`; the same head with its norms shared across levels
# (`mabn2_all_late`) fails there. MABN recipe for detection
# (docs/det_small_batch_study.md):
# - buffer_size=16: the paper's rule, simulated batch / images per GPU = 32 / 2;
# - warmup_iters = renorm_iters = 2000: 4x mmdet's linear learning-rate warm-up
#   (schedule_1x: LinearLR over 500 iterations), batch statistics until the weights have
#   settled. On the toy (study row `mabn2_late`) this start beat BN at 2 images, and
#   starting with the end of the lr warm-up did not; there the late start was 2/3 of a
#   short schedule, here it is 2% of 90k iterations: the rule carried over, not measured
#   on COCO;
# - r_max=5, momentum=0.02 (PyTorch sense, the paper's 0.98 decay).
# Initialisation: the torchvision BN checkpoint of mmdet's config loads with MABN's
# eval-exact statistics mapping, but ConvWC's kernel centring moves the outputs (measure
# with `python tools/mabn_from_bn.py`). The paper starts from a backbone
# pre-trained with ConvWC + MABN: point init_cfg.checkpoint at one when you have it.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16, warmup_iters=2000,
                renorm_iters=2000, r_max=5.0, momentum=0.02)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    bbox_head=dict(type='LevelNormRetinaHead', conv_cfg=conv_cfg, norm_cfg=norm_cfg))
