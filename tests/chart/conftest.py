"""tests/chart: the `trainer_image` marker (registered here so pyproject.toml's marker list stays as it is)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "trainer_image: builds and runs the CUDA trainer image (tests/chart/test_trainer_image.py; ~6 min and ~7 GB "
        "of disk cold on 2 cores; in `make test` and `make test-images`)")
