"""Example services downstream of relay: what a receiver of relay's deliveries looks like."""
