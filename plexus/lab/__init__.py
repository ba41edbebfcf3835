"""The lab: the whole system on one machine, out of network namespaces."""
