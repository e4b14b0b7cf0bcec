"""Run every benchmark: `make bench` (or `python -m bench.run`)."""

from bench import fleet_bench, image_bench, subd_bench


def main() -> None:
    """Each benchmark prints its table and saves JSON to bench/results/."""
    image_bench.main()
    subd_bench.main()
    fleet_bench.main([])


if __name__ == "__main__":
    main()
