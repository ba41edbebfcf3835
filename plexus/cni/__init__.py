"""The Plexus CNI plugin (CNI spec 1.0) and the runtime-side helper that calls it."""
