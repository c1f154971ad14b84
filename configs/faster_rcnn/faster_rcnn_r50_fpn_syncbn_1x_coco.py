# Faster R-CNN R50-FPN 1x on COCO 2017 with PortableSyncBN in the backbone, trained (not
# frozen): batch statistics over the images of all processes, on GPUs (nccl) or CPU (gloo).
#   tools/dist_train.sh configs/faster_rcnn/faster_rcnn_r50_fpn_syncbn_1x_coco.py 8
_base_ = './faster_rcnn_r50_fpn_bn_1x_coco.py'

model = dict(backbone=dict(norm_cfg=dict(type='PortableSyncBN', requires_grad=True),
                           norm_eval=False))
# every rank's loss over the group's mean count (positive anchors, sampled RoIs, masks),
# not its own: with it, N processes x b images take one big batch's step (RoI sampling
# aside; docs/sync_bn.md, tools/check_sync.py)
custom_hooks = [dict(type='GlobalLossNormHook')]
