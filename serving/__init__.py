"""What both services' adapters share (gRPC, Redis, the plan wire format), so that neither service
imports the other: `env` flags and secrets, `service` (main, logging, health, the error
interceptor, the torch thread), `security` (TLS, bearer tokens, the Redis ACL user),
`redis_client` and `plan_wire` (key names and both directions of the plan messages).
The engine both services run is clasp/, which knows none of this."""
