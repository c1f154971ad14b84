# The toy RetinaNet with PortableSyncBN in the backbone: batch statistics over all
# processes' images (gloo on CPU, nccl on GPU); one process trains as plain BN.
#   tools/dist_train.sh configs/toy/retinanet_r18_fpn_syncbn_toy.py 2
# GlobalLossNormHook divides every rank's loss by the group's mean count of positive
# anchors (RetinaHead divides by its own rank's): with both, N processes x b images take
# the same step as 1 process x N*b (tools/check_sync.py shows it; docs/sync_bn.md).
# The other settings are those of the plain-BN toy config.
_base_ = './retinanet_r18_fpn_bn_toy.py'

norm_cfg = dict(type='PortableSyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg, norm_eval=False))
custom_hooks = [dict(type='GlobalLossNormHook')]
