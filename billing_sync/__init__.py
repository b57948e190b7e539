"""Billing sync: moves closed usage buckets to Stripe Billing Meters."""
