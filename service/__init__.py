"""crm-backend core: configuration, domain, Evolution reader, analyzers, stores, pipeline."""
