"""The Redis client both services use: one construction for URL, ACL user, password and TLS."""

from __future__ import annotations

import redis

from serving.env import env, secret_from_env

DEV_PASSWORD_PREFIX = "dev-only"  # deploy/base/redis-password.env's committed value starts so


def redis_client(url: str) -> redis.Redis:
    """Short timeouts: a dead Redis must not stall the threads that use it for long. The password
    comes from CLASP_REDIS_PASSWORD_FILE or CLASP_REDIS_PASSWORD, the ACL user from
    CLASP_REDIS_USERNAME (serving.security.REDIS_USER's rules; unset: the default user). A rediss://
    URL is TLS, verified against CLASP_REDIS_CA_FILE (else the system's roots)."""
    password = secret_from_env("REDIS_PASSWORD")
    if password and password.startswith(DEV_PASSWORD_PREFIX) and env("ALLOW_DEV_REDIS_PASSWORD") != "1":
        raise ValueError("the Redis password is deploy/base's committed dev-only one: set a real one "
                         "(deploy/README.md, 'Changing the Redis password'), or CLASP_ALLOW_DEV_REDIS_PASSWORD=1 "
                         "on a throwaway cluster")
    options = dict(username=env("REDIS_USERNAME")) if env("REDIS_USERNAME") else {}
    if env("REDIS_CA_FILE"):  # TLS to Redis: a rediss:// URL, verified against this CA
        if not url.startswith("rediss://"):
            raise ValueError("CLASP_REDIS_CA_FILE needs a rediss:// Redis URL")
        options["ssl_ca_certs"] = env("REDIS_CA_FILE")
    return redis.Redis.from_url(url, password=password, socket_timeout=1.0,
                                socket_connect_timeout=1.0, health_check_interval=10, **options)
