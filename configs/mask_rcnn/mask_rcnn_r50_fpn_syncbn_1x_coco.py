# Mask R-CNN R50-FPN 1x on COCO 2017 with PortableSyncBN in the backbone, the FPN and a
# 4conv1fc box head and the mask head, trained: batch statistics over the images of all
# processes (the paper's SyncBN row is 2 images x 8 GPUs), on nccl or gloo.
#   tools/dist_train.sh configs/mask_rcnn/mask_rcnn_r50_fpn_syncbn_1x_coco.py 8
_base_ = './mask_rcnn_r50_fpn_bn_1x_coco.py'

norm_cfg = dict(type='PortableSyncBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg, norm_eval=False),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
# every rank's loss over the group's mean count (positive anchors, sampled RoIs, masks),
# not its own: with it, N processes x b images take one big batch's step (RoI sampling
# aside; docs/sync_bn.md, tools/check_sync.py)
custom_hooks = [dict(type='GlobalLossNormHook')]
