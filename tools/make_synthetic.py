"""Write the synthetic COCO-format shapes dataset: ``python tools/make_synthetic.py
[OUT_DIR] [--num-train N] [--num-val N] [--image-size PX] [--seed S]``."""
import argparse

from mmdet_bnplug.testing.synthetic import SyntheticSpec, generate


def main(argv=None):
    parser = argparse.ArgumentParser(description='Generate the synthetic shapes dataset')
    parser.add_argument('out_dir', nargs='?', default='data/synthetic')
    parser.add_argument('--num-train', type=int, default=2000)
    parser.add_argument('--num-val', type=int, default=200)
    parser.add_argument('--image-size', type=int, default=SyntheticSpec.image_size)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    spec = SyntheticSpec(image_size=args.image_size)
    for ann_file in generate(args.out_dir, args.num_train, args.num_val, args.seed, spec):
        print(f'wrote {ann_file}')


if __name__ == '__main__':
    main()
