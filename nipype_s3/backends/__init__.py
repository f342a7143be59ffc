"""Remote-execution backends on the shared core (:mod:`nipype_s3.remote`): each holds only
what differs (``ec2``: instances, user-data, SQS job queues)."""
