# The toy Mask R-CNN with ConvWC + MABN where the MABN paper puts them: the backbone, the
# FPN, a 4conv1fc box head and the mask head. buffer_size=4 is the paper's rule (a
# simulated batch of 32 over 8 images per batch); warmup_iters=100 matches the learning-
# rate warm-up; renorm_iters=300 leaves renormalisation for 80% of the schedule.
# Not the 2-image recipe (retinanet_r18_fpn_mabn_2img_toy.py, averages from 4x the lr
# warm-up): at 8 images per batch this early start trained, 0.934 bbox mAP against the BN
# Mask R-CNN toy's 0.910 (README, Results; one seed each).
_base_ = './mask_rcnn_r18_fpn_bn_toy.py'

norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=4, warmup_iters=100,
                renorm_iters=300)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=128,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
