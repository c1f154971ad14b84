# The toy RetinaNet with BN in the backbone and in the FPN, and the FPN's norms frozen by
# name: FreezeNormsHook keeps every BN-like layer matching 'neck.*' in eval mode for the
# whole run (whatever .train() calls happen), while the backbone's BN trains. The same
# pattern freezes norms in any part of a detector, e.g. 'roi_head.bbox_head.*'.
#   python tools/train.py configs/toy/retinanet_r18_fpn_bn_frozen_neck_toy.py
#   python tools/inspect_norms.py configs/toy/retinanet_r18_fpn_bn_frozen_neck_toy.py
_base_ = './retinanet_r18_fpn_bn_toy.py'

model = dict(neck=dict(norm_cfg=dict(type='BN', requires_grad=True)))
custom_hooks = [
    dict(type='FreezeNormsHook', include=['neck.*'], freeze_affine=False),
    dict(type='NormEvalCheckHook', interval=50, action='error'),
]
