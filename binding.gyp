{
  "targets": [
    {
      "target_name": "lakebase_relay",
      "sources": ["native/relay.c", "native/txclient.c", "native/listener.c", "native/addon.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-Werror=incompatible-pointer-types"],
      "ldflags": ["-Wl,-z,now"],
      "defines": ["NAPI_VERSION=8", "OPENSSL_API_COMPAT=30000", "OPENSSL_NO_DEPRECATED"]
    }
  ]
}
