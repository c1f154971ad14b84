"""Run by test_mmpretrain_configs.py in the mmpretrain environment (its own torch and
torchvision): builds CONFIG's model through mmpretrain's registry and runs one training
step on synthetic images; prints a JSON summary on the last line."""
import json
import sys

import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope


def main(path):
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(path)
    init_default_scope('mmpretrain')
    import mmdet_bnplug
    model = MODELS.build(cfg.model)
    model.init_weights()
    norms = [m for m in model.backbone.modules()
             if type(m).__name__ == cfg.model.backbone.norm_cfg.type]
    convs = [m for m in model.backbone.modules() if type(m).__name__ == 'ConvWC']
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='SGD', lr=0.01)))
    g = torch.Generator().manual_seed(0)
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=g)
                        for _ in range(cfg.train_dataloader.batch_size)],
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    model.train()
    before = model.backbone.conv1.weight.detach().clone()
    losses = model.train_step(data, wrapper)
    print(json.dumps(dict(
        plugin=mmdet_bnplug.__file__, torch=torch.__version__, loss=float(losses['loss']),
        norms=len(norms), convs=len(convs),
        steps=sorted({int(m.num_batches_tracked) for m in norms}),
        conv1_moved=bool((model.backbone.conv1.weight - before).abs().max() > 0))))


if __name__ == '__main__':
    main(sys.argv[1])
