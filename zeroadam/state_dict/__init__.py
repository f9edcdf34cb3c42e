"""state_dict"""
