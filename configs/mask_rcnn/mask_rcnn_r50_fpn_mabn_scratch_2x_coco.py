# Mask R-CNN R50-FPN on COCO 2017 as in the MABN paper's detection table: trained from
# scratch for 2x (24 epochs) at 2 images per GPU, ConvWC + MABN in the backbone, the FPN,
# a 4conv1fc box head and the mask head (paper: box AP 36.50 for MABN at 2 images per
# GPU, 32.38 for BN, 36.80 for SyncBN over 2x8). MABN's defaults are the paper's
# detection setting: buffer_size=16 (= 32 / 2 images), warmup_iters=100,
# renorm_iters=1000, r_max=5, momentum=0.02 (PyTorch's sense: the paper's 0.98 decay).
_base_ = './mask_rcnn_r50_fpn_bn_1x_coco.py'

norm_cfg = dict(type='MABN', requires_grad=True)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False, frozen_stages=-1,
                  init_cfg=None),  # from scratch
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))

max_epochs = 24
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[16, 22],
         gamma=0.1)
]
# no weight decay on the norms' affine parameters, as in mmdet's from-scratch configs
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0))
