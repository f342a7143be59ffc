# The test image: Debian's Python with nipype, nibabel and boto3 at the controller's
# versions (PINS), and a tool that exists only here: /usr/local/bin/mcflirt, a stand-in
# for FSL's (it copies the series as float32 and writes a motion file of zeros).
FROM nipype-s3-test/debian:bookworm
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# the build machine's CA bundle (package index behind an intercepting proxy), used by pip
# during the build only; kept apart from the image's own bundle
COPY build-ca.pem /usr/local/share/nipype-s3-build-ca.pem
ARG PINS
RUN python3 -m venv /opt/venv \
 && PIP_CERT=/usr/local/share/nipype-s3-build-ca.pem /opt/venv/bin/pip install -q \
      --no-cache-dir $PINS \
 && rm /usr/local/share/nipype-s3-build-ca.pem
ENV PATH=/opt/venv/bin:$PATH FSLOUTPUTTYPE=NIFTI_GZ
COPY fake-mcflirt /usr/local/bin/mcflirt
