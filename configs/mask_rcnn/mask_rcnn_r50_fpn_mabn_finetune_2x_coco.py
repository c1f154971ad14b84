# The paper's Mask R-CNN with ConvWC + MABN (backbone, FPN, 4conv1fc box head, mask head),
# fine-tuned from mmdet's ImageNet BN backbone instead of trained from scratch. The BN
# statistics load eval-exactly into MABN (running_var := var + mean^2, the mean absorbed
# into weight and bias), but ConvWC's kernel centring moves the outputs, and the paper
# reports far lower AP from BN weights than from a ConvWC + MABN pretrained backbone:
# measure the change first with
#   python tools/mabn_from_bn.py CONFIG torchvision://resnet50 OUT.pth --submodule backbone
_base_ = './mask_rcnn_r50_fpn_mabn_scratch_2x_coco.py'

model = dict(backbone=dict(
    frozen_stages=1,
    init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='torchvision://resnet50')))
