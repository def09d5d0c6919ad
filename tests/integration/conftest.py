import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 with 2 CPUs, shared by the session's tests."""
    import ray

    from teacher_cache.ray_pool import connect_ray

    started = connect_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
