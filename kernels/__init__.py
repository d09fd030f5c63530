"""Custom ops (``lowrank::...``) with reference, fake and Triton implementations.

Weight compression needs no custom op: a factored linear is two ``F.linear``
calls that Inductor fuses and schedules itself. The latent-KV attention ops
land here with the latent KV cache (see docs/architecture.md). Importing the
package defines the ops a compressed model's own graph calls (AQ linears,
grouped K/V projections, latent attention), so that a ``torch.export.load``-ed
program of it runs after ``import lrcompile``. The latent cache's ops come with
``lrcompile.LatentKVCache``: defining them this early changed how Dynamo
captured a later generate call in the CLI tests (attention read as unmatched).
"""

from . import aq_linear, grouped_projection, latent_attention  # noqa: F401
