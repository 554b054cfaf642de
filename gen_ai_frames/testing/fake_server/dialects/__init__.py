"""The vendors' wire formats the fake server speaks, one module each.

The same fake model speaks several vendors' APIs. A dialect knows one vendor's wire format:
where the key goes, where the prompt and the options are in the body, and what answers and
errors look like. ``FakeLLM._answer`` does everything else (stats, directives, chaos, latency)
once for all of them, so every dialect gets the same test tools.
"""
