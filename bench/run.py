"""Run every benchmark: `make bench` (or `python -m bench.run`)."""

from bench import dashboard, fleet_bench, image_bench, subd_bench


def main() -> None:
    """Each benchmark prints its table and saves JSON to bench/results/."""
    image_bench.main([], standalone_mode=False)
    subd_bench.main([], standalone_mode=False)
    fleet_bench.main([])
    dashboard.main([], standalone_mode=False)


if __name__ == "__main__":
    main()
