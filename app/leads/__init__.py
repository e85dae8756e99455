"""Leads: sold once, for credits, in one transaction."""
