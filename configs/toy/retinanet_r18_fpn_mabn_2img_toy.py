# The toy RetinaNet with ConvWC + MABN in the backbone at 2 images per batch, the
# detection regime MABN is for (docs/det_small_batch_study.md). Same training images
# as the batch-8 BN toy: 4x its iterations, learning rate scaled linearly with the batch
# (AdamW 1e-3 at 8 -> 2.5e-4 at 2), warm-up and decay steps scaled the same way.
# MABN recipe for detection:
# - buffer_size=16: the paper's rule, simulated batch / images per GPU = 32 / 2;
# - warmup_iters = the learning-rate warm-up (400 iterations): batch statistics while
#   the weights move fastest, when averages over past iterations would be stale;
# - renorm_iters = 20% of the schedule (the paper's 1000 suits ImageNet-length runs).
# benchmarks/det_small_batch_study.py sets its own (shorter) schedule on top.
_base_ = './retinanet_r18_fpn_bn_toy.py'

max_iters = 6000
warmup = 400
norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16, warmup_iters=warmup,
                renorm_iters=1200, r_max=5.0, momentum=0.02)
model = dict(
    backbone=dict(conv_cfg=dict(type='ConvWC'), norm_cfg=norm_cfg, norm_eval=False))
train_dataloader = dict(batch_size=2)
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=2.5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.75), int(max_iters * 0.9)], gamma=0.1)
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
