# Keeps the largest "mem LABEL: X MiB in use, Y MiB reserved" line per label; passes other lines.
/^mem / {
  split($0, a, ": "); split(a[2], b, " ");
  if (!(a[1] in m) || b[1] + 0 > m[a[1]]) { m[a[1]] = b[1] + 0; r[a[1]] = b[5] + 0 }
  next
}
/sec_per_step|rror|^step|loss/ { print }
END { for (k in m) printf "%s: %.1f MiB in use, %.1f MiB reserved\n", k, m[k], r[k] }
