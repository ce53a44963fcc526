"""Applications built on the plugin, not part of it: the `ciris-billing-proxy` command (`cli`), the
demo agent it serves (`demo`), its password store (`users`) and the billing QA checklist (`qa`)."""
