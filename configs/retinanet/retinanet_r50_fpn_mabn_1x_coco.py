# RetinaNet R-50 FPN 1x on COCO (data/coco/) with ConvWC + MABN in the backbone, trained
# (norm_eval=False) at mmdet's 2 images per GPU. MABN defaults are the paper's detection
# setting: buffer_size=16 (= 32 / 2), warmup_iters=100, renorm_iters=1000, r_max=5,
# momentum=0.02 (PyTorch sense, i.e. the paper's 0.98 decay).
# Initialisation: the torchvision BN checkpoint of mmdet's config loads with MABN's
# eval-exact statistics mapping, but ConvWC's kernel centring moves the outputs (measure
# with `python tools/mabn_from_bn.py`). The paper starts from a backbone
# pre-trained with ConvWC + MABN: point init_cfg.checkpoint at one when you have it.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

norm_cfg = dict(type='MABN', requires_grad=True)
model = dict(
    backbone=dict(conv_cfg=dict(type='ConvWC'), norm_cfg=norm_cfg, norm_eval=False))
