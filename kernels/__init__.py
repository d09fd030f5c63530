"""Custom ops (``lowrank::...``) with reference, fake and Triton implementations.

Weight compression needs no custom op: a factored linear is two ``F.linear``
calls that Inductor fuses and schedules itself. The latent-KV attention ops
land here with the latent KV cache (see docs/architecture.md).
"""
