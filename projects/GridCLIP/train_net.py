#!/usr/bin/env python
"""Train and evaluate GridCLIP and the ViLD baseline with Detectron2.

    python projects/GridCLIP/train_net.py --config-file GridCLIP_R50.yaml
    python projects/GridCLIP/train_net.py --config-file ViLD_R50.yaml --eval-only \
        MODEL.WEIGHTS m.pth
    python projects/GridCLIP/train_net.py --config-file GridCLIP_R50.yaml --num-gpus 8
    python projects/GridCLIP/train_net.py --config-file GridCLIP_R50.yaml --resume   # after a kill

``--config-file`` takes a path or a name under projects/GridCLIP/configs/. Multi-GPU and
multi-machine runs go through Detectron2's ``launch`` (PyTorch DDP): see the README.
"""

import logging

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.config import get_gridclip_cfg, resolve_config_path
from gridclip.engine import (
    AtomicCheckpointer,
    Trainer,
    check_resume_config,
    lock_output_dir,
    write_results,
)
from gridclip_tools.args import check_weights_file

logger = logging.getLogger("gridclip")


def setup(args):
    if args.config_file:  # a path, or a name under projects/GridCLIP/configs/
        args.config_file = resolve_config_path(args.config_file)
    cfg = get_gridclip_cfg(args.config_file, args.opts)
    cfg.freeze()
    if args.eval_only:  # before anything is built or written (fvcore: a bare AssertionError)
        check_weights_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS (--eval-only)")
    if not args.eval_only and comm.is_main_process():
        lock_output_dir(cfg.OUTPUT_DIR)  # a second run into the folder fails here, naming this one
        if args.resume:
            check_resume_config(cfg)  # before default_setup overwrites config.yaml
    default_setup(cfg, args)
    # the project's own messages (data checks, resume, teacher caches) also go to log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gridclip")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            write_results(cfg, results, "eval_results.json")
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if comm.is_main_process() and results:
        write_results(cfg, results, "results.json")
    return results


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
