# The toy RetinaNet on an EfficientNet-B0 backbone wrapped in NormEval: norm_eval enforced
# on every BN-like layer of the backbone, also after later .train() calls (EfficientNet's
# own norm_eval only recognises nn.BatchNorm2d). For fine-tuning a pretrained backbone;
# here trained from scratch on the synthetic shapes like the other toys.
#   python tools/train.py configs/toy/retinanet_effb0_normeval_toy.py
_base_ = './retinanet_r18_fpn_bn_toy.py'

model = dict(
    backbone=dict(
        _delete_=True,  # replace the ResNet-18 of the base config, do not merge into it
        type='NormEval',
        norm_eval=True,
        freeze_affine=False,
        backbone=dict(type='EfficientNet', arch='b0', out_indices=(3, 4, 5),
                      norm_cfg=dict(type='BN', requires_grad=True, eps=1e-3,
                                    momentum=0.01))),
    # EfficientNet-B0's stages 3-5 have 40, 112 and 320 channels (strides 8, 16, 32)
    neck=dict(in_channels=[40, 112, 320]))
