"""Custom ops (``lowrank::...``) with reference, fake and Triton implementations.

Weight compression needs no custom op: a factored linear is two ``F.linear``
calls that Inductor fuses and schedules itself. The latent-KV attention ops
land here with the latent KV cache (see docs/architecture.md).

``import lrcompile`` defines the ops (it imports their modules by name), not
this file: run from a checkout, whose root is on ``sys.path``, this folder is
also importable as a top-level ``kernels``, which transformers imports while
probing for the Hugging Face package of that name; ops defined here would then
be defined a second time, by modules of another name.
"""
