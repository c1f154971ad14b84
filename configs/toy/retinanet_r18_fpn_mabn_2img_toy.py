# The toy RetinaNet with ConvWC + MABN in the backbone at 2 images per batch, the
# detection regime MABN is for: row `mabn2_late` of the detection study
# (docs/det_small_batch_study.md), which beats BN at 2 images on the same images.
# Schedule: the study's, 4800 training images (2400 iterations at 2), AdamW at the
# batch-8 toy's learning rate scaled linearly (1e-3 at 8 -> 2.5e-4 at 2), linear warm-up
# over the first 1/6 (400 iterations), x0.1 at 75% and 90%.
# MABN recipe for detection:
# - buffer_size=16: the paper's rule, simulated batch / images per GPU = 32 / 2;
# - warmup_iters = renorm_iters = 4x the learning-rate warm-up (1600 iterations): batch
#   statistics until the weights have settled, then the moving averages for the last
#   third, through both learning-rate decays. Starting them with the end of the lr
#   warm-up (400) instead is the study's `mabn2` row: a gradient spike, no gain over BN.
#   The same layer on batch statistics throughout (`mabn2_batch`) does as well as this
#   recipe: the gain over BN is ConvWC with uncentred normalisation, not the averages.
_base_ = './retinanet_r18_fpn_bn_toy.py'

max_iters = 2400
warmup = 400
norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16, warmup_iters=4 * warmup,
                renorm_iters=4 * warmup, r_max=5.0, momentum=0.02)
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
