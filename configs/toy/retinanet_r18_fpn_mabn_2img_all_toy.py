# As retinanet_r18_fpn_mabn_2img_toy.py, with ConvWC + MABN also in the FPN and a normed
# RetinaNet head, where the paper puts them (its detectors norm backbone, FPN and head).
# RetinaHead applies each of its convs and norms once per FPN level (4 levels here), so a
# head MABN layer advances its counter and ring buffers 4 times per iteration: its
# buffer_size, warmup_iters and renorm_iters are 4x those of the backbone to cover the
# same iterations (its statistics then also mix the four levels, as GN's would not).
# It is the study's row `mabn2_all_late` (`mabn2_all`: averages from iteration 400), and
# it fails: training breaks when the head's moving averages start (0.037 bbox mAP against
# 0.506 with MABN in the backbone only, 0.502 in backbone and FPN). Kept as the measured
# counter-example to the paper's placement; use the backbone (+ FPN) config.
_base_ = './retinanet_r18_fpn_mabn_2img_toy.py'

levels = 4
head_norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=levels * 16,
                     warmup_iters=levels * 1600, renorm_iters=levels * 1600, r_max=5.0,
                     momentum=0.02)
model = dict(
    neck=dict(conv_cfg=dict(type='ConvWC'), norm_cfg={{_base_.norm_cfg}}),
    bbox_head=dict(conv_cfg=dict(type='ConvWC'), norm_cfg=head_norm_cfg))
