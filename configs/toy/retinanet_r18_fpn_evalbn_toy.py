# RetinaNet R18-FPN with EvalBN, fine-tuned from the BN toy at 2 images per batch: the
# detection regime where BN's batch statistics are noise. EvalBN keeps the statistics the
# BN toy learned at batch 8, fine-tunes the affine and the rest of the network, and
# NormEvalCheckHook verifies every 50 iterations that no statistic moved.
#
# Train the BN toy first (its last checkpoint is load_from below), then this config:
#   python tools/train.py configs/toy/retinanet_r18_fpn_bn_toy.py
#   python tools/train.py configs/toy/retinanet_r18_fpn_evalbn_toy.py
# or start from any other checkpoint with --cfg-options load_from=PATH.
_base_ = './retinanet_r18_fpn_bn_toy.py'

load_from = 'work_dirs/retinanet_r18_fpn_bn_toy/iter_1500.pth'  # the BN toy's last iter
model = dict(
    backbone=dict(norm_cfg=dict(type='EvalBN', requires_grad=True), norm_eval=True))
train_dataloader = dict(batch_size=2)

max_iters = 600
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=2e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.75)], gamma=0.1)
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
custom_hooks = [dict(type='NormEvalCheckHook', interval=50, action='error')]
