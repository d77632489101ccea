"""Chapter package; importing it registers its models."""
