"""Joining a multi-host run from a command line (the experiments' and the benchmarks'): --distributed calls
jax.distributed.initialize() before any other JAX work. JAX finds the coordinator, the process count and this
process's index itself on Cloud TPU, Slurm and Kubernetes; elsewhere it reads only JAX_COORDINATOR_ADDRESS from the
environment, so --coordinator, --num-processes and --process-id give them."""

import argparse

import jax


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--distributed, --coordinator, --num-processes and --process-id."""
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host; run the same command on every host)")
    parser.add_argument("--coordinator", help="host:port of process 0 (with --distributed, where not auto-detected)")
    parser.add_argument("--num-processes", type=int, help="number of processes (with --distributed)")
    parser.add_argument("--process-id", type=int, help="this process's index (with --distributed)")


def initialize(args: argparse.Namespace) -> None:
    """jax.distributed.initialize() with args' coordinator, process count and index, where args.distributed."""
    if args.distributed:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
