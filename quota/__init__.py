"""Plans, rate limits and period quotas (built on metering)."""
