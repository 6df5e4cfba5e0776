"""tests/chart: the `trainer_image` marker (registered here so pyproject.toml's marker list stays as it is)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "trainer_image: builds and runs the CUDA trainer image (tests/chart/test_trainer_image.py; ~20 min cold, "
        "~15 GB of disk): `make test-images`, not `make test`")
