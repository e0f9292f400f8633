"""Generate the embedded world (an LVIS-format open-vocabulary detection dataset).

    python tools/make_world.py                     # $DETECTRON2_DATASETS/gridclip_world (demo)
    python tools/make_world.py --preset ci         # .../gridclip_world_ci (tiny, for tests)
    python tools/make_world.py --root /data/w --num-train 2000 --seed 1
    python tools/make_world.py --split-seed 1      # .../gridclip_world_split1: other novel classes

It also writes the world's image-text pairs (captioned images without boxes) to
``<root>/pairs`` (``--num-pairs``; 0 for none).

Cached: rerunning with the same parameters returns at once. Atomic: an interrupted run leaves
no partial world. See datasets/README.md for the layout and gridclip/data/world.py for the
renderer.
"""

import argparse
import logging
import time

from gridclip.data.world import PRESETS, default_world_root, generate_world, generate_world_pairs
from gridclip_tools.args import positive_int


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument(
        "--root",
        default=None,
        help="output folder (default: by preset under "
        "$DETECTRON2_DATASETS, which defaults to ./datasets)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the images")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="which classes are novel: 0 is the default split; 1 and 2 are registered at import "
        "as gridclip_world_split<k>_{train,train_full,val} (default root by preset and split)",
    )
    p.add_argument("--num-train", type=positive_int, default=None, help="override the preset")
    p.add_argument("--num-val", type=positive_int, default=None, help="override the preset")
    p.add_argument("--image-size", type=positive_int, default=None, help="override the preset")
    p.add_argument("--image-format", default="jpg", choices=["jpg", "png"])
    p.add_argument(
        "--num-pairs",
        type=int,
        default=None,
        help="image-text pairs (captioned images, no boxes) written to <root>/pairs "
        "(default: 1000 for demo, 16 for ci; 0: none)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if args.split_seed < 0:
        raise SystemExit(f"--split-seed must be >= 0, got {args.split_seed}")
    root = args.root or default_world_root(args.preset, args.split_seed)
    start = time.perf_counter()
    manifest = generate_world(
        root,
        preset=args.preset,
        seed=args.seed,
        split_seed=args.split_seed,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        image_format=args.image_format,
        progress=True,
    )
    pairs = None
    if args.num_pairs != 0:
        pairs = generate_world_pairs(root, num_pairs=args.num_pairs, progress=True)
    elapsed = time.perf_counter() - start
    params = manifest["params"]
    print(
        f"World at {root} (preset {params['preset']}, seed {params['seed']}, "
        f"split seed {params.get('split_seed', 0)}, "
        f"{params['image_size']} px), {elapsed:.1f} s:"
    )
    for split, s in manifest["summary"].items():
        groups = ", ".join(f"{k}={v}" for k, v in s["instances_per_frequency"].items())
        print(f"  {split:5s}: {s['images']} images, {s['instances']} instances ({groups})")
    if pairs is not None:
        s = pairs["summary"]
        groups = ", ".join(f"{k}={v}" for k, v in s["phrases_per_frequency"].items())
        print(f"  pairs: {s['images']} images, {s['captions']} captions (phrases {groups})")
    return 0
