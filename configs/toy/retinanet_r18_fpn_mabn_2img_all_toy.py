# As retinanet_r18_fpn_mabn_2img_toy.py, with ConvWC + MABN also in the FPN and in a
# normed RetinaNet head with per-level statistics (LevelNormRetinaHead: the head's convs
# stay shared across the 4 FPN levels, each of its norms holds one MABN per level), where
# the paper puts them (its detectors norm backbone, FPN and head). Each level's MABN is
# called once per iteration, so the head takes the backbone's recipe unchanged.
# It is the study's row `mabn2_all_lvl_late` (docs/det_small_batch_study.md); with the
# head's norms shared across levels instead (`mabn2_all_late`) training breaks when the
# moving averages start.
_base_ = './retinanet_r18_fpn_mabn_2img_toy.py'

model = dict(
    neck=dict(conv_cfg=dict(type='ConvWC'), norm_cfg={{_base_.norm_cfg}}),
    bbox_head=dict(type='LevelNormRetinaHead', conv_cfg=dict(type='ConvWC'),
                   norm_cfg={{_base_.norm_cfg}}))
