"""fftrainer_ds"""
