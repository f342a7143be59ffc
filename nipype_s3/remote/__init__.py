"""The backend-neutral core of remote execution (EC2 today, AWS Batch next).

``placement`` decides what runs on the controller, ``staging`` sends a job (files by
digest, a signed spec), ``collect`` brings a finished job back (signed report verified,
every path confined), ``costs`` reports and caps the bill, and ``plugin`` is the nipype
plugin base a backend subclasses (``nipype_s3.backends.<name>``), adding only what
differs: where jobs go and what runs them. The signed documents themselves are made in
:mod:`nipype_s3.ec2.jobs`.
"""
