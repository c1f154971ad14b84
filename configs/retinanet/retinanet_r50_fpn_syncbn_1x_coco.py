# RetinaNet R-50 FPN 1x on COCO with PortableSyncBN in the backbone, trained (not frozen)
# like mmdet's "-syncbn" configs: batch statistics over the images of all processes.
# Works on GPUs (nccl) and on CPU (gloo); group_size=N in norm_cfg syncs within blocks of
# N consecutive ranks instead of all of them.
#   tools/dist_train.sh configs/retinanet/retinanet_r50_fpn_syncbn_1x_coco.py 8
_base_ = './retinanet_r50_fpn_bn_1x_coco.py'

norm_cfg = dict(type='PortableSyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg, norm_eval=False))
# every rank's loss over the group's mean count (positive anchors, sampled RoIs, masks),
# not its own: with it, N processes x b images take one big batch's step (RoI sampling
# aside; docs/sync_bn.md, tools/check_sync.py)
custom_hooks = [dict(type='GlobalLossNormHook')]
