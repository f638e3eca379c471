"""pykernels"""
