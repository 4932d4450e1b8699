// The moe-serve version string, checked at registration so one deployment runs one version.
#pragma once
#define MOE_SERVE_VERSION "0.1.0"
