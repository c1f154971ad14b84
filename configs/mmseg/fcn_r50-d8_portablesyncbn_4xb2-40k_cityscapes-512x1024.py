# mmsegmentation's FCN R50-D8 on Cityscapes (data/cityscapes/) with PortableSyncBN instead
# of torch's SyncBN in the backbone, decode head and auxiliary head: the same global-batch
# statistics, and it also runs on CPU with gloo. Needs the optional extra: pip install
# -e '.[mmseg]'. Found through mmengine's root registry: no mmseg-specific registration.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

norm_cfg = dict(type='PortableSyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg),
             auxiliary_head=dict(norm_cfg=norm_cfg))
