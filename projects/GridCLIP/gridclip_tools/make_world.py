"""Generate the embedded world (an LVIS-format open-vocabulary detection dataset).

    python tools/make_world.py                     # $DETECTRON2_DATASETS/gridclip_world (demo)
    python tools/make_world.py --preset ci         # .../gridclip_world_ci (tiny, for tests)
    python tools/make_world.py --root /data/w --num-train 2000 --seed 1

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument(
        "--root",
        default=None,
        help="output folder (default: by preset under "
        "$DETECTRON2_DATASETS, which defaults to ./datasets)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=None, help="override the preset")
    p.add_argument("--num-val", type=int, default=None, help="override the preset")
    p.add_argument("--image-size", type=int, default=None, help="override the preset")
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
    root = args.root or default_world_root(args.preset)
    start = time.perf_counter()
    manifest = generate_world(
        root,
        preset=args.preset,
        seed=args.seed,
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
