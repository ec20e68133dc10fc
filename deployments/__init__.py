"""Ray Serve applications (one module per deployment), named by `import_path` in their YAML files."""
