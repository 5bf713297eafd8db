# Boot counting (README "Boot chain"): treeflash_bootlimit tries, @BOOTLIMIT@
# unless the environment sets 1 to 8. (Not U-Boot's own bootlimit, which a
# U-Boot built with bootcount support would act on by itself.) A deployment is a trial until the booted system marks
# it good, by writing /ostree/boot.N/treeflash-good.env with the uEnv.txt
# bootargs of the good entry: OSTree replaces that folder at every deploy, so
# an upgrade is a trial again without any hook. Only trial boots are counted,
# in a 512-byte environment at block @STATE_BLOCK@ of the card. After
# treeflash_bootlimit failed tries the previous deployment boots, and keeps booting until the
# next upgrade. A boot the system acknowledged (boot/treeflash/ack.env) ends
# the tries of its trial, so a new one starts from zero.
if test -z "${treeflash_bootlimit}"; then setenv treeflash_bootlimit @BOOTLIMIT@; fi
# setexpr counts in hex and test compares decimal: they agree below 10.
if test ${treeflash_bootlimit} -lt 1; then setenv treeflash_bootlimit @BOOTLIMIT@; fi
if test ${treeflash_bootlimit} -gt 8; then setenv treeflash_bootlimit @BOOTLIMIT@; fi
setenv treeflash_mark 0
setenv treeflash_good none
if test -e ${devtype} ${ostree_part} /ostree/boot.0/treeflash-good.env; then
  load ${devtype} ${ostree_part} ${scriptaddr} /ostree/boot.0/treeflash-good.env
  env import -t ${scriptaddr} ${filesize} treeflash_good
  if test "${treeflash_good}" = "${bootargs}"; then setenv treeflash_mark 1; fi
  if test -n "${bootargs2}"; then
    if test "${treeflash_good}" = "${bootargs2}"; then setenv treeflash_mark 2; fi
  fi
fi
setenv treeflash_good none
if test -e ${devtype} ${ostree_part} /ostree/boot.1/treeflash-good.env; then
  load ${devtype} ${ostree_part} ${scriptaddr} /ostree/boot.1/treeflash-good.env
  env import -t ${scriptaddr} ${filesize} treeflash_good
  if test "${treeflash_good}" = "${bootargs}"; then setenv treeflash_mark 1; fi
  if test -n "${bootargs2}"; then
    if test "${treeflash_good}" = "${bootargs2}"; then setenv treeflash_mark 2; fi
  fi
fi
setenv treeflash_acked none
if test -e ${devtype} ${ostree_part} /boot/treeflash/ack.env; then
  load ${devtype} ${ostree_part} ${scriptaddr} /boot/treeflash/ack.env
  env import -t ${scriptaddr} ${filesize} treeflash_acked
fi
setenv treeflash_tries 0
setenv treeflash_serial 0
${devtype} dev ${devnum}
mw.b ${scriptaddr} 0 0x200
if ${devtype} read ${scriptaddr} @STATE_BLOCK@ 1; then
  env import -c ${scriptaddr} 0x200 treeflash_tries treeflash_serial
fi

if test "${boot_entry}" = "2"; then
  echo "treeflash: rollback=1: not counting this boot"
elif test "${treeflash_mark}" = "1"; then
  setenv treeflash_state good
  echo "treeflash: the current deployment is known good"
elif test "${treeflash_mark}" = "2"; then
  setenv treeflash_state rolled-back
  setenv boot_entry 2
  echo "treeflash: the current deployment was rolled back; the previous one is known good"
elif test -z "${kernel_image2}"; then
  setenv treeflash_state only
  echo "treeflash: the only deployment, nothing to fall back to: not counting"
else
  if test "${treeflash_serial}" = "${treeflash_acked}"; then setenv treeflash_tries 0; fi
  if test ${treeflash_tries} -le ${treeflash_bootlimit}; then
    setexpr treeflash_tries ${treeflash_tries} + 1
    setexpr treeflash_serial ${treeflash_serial} + 1
    mw.b ${scriptaddr} 0 0x200
    env export -c -s 0x200 ${scriptaddr} treeflash_serial treeflash_tries
    if ${devtype} write ${scriptaddr} @STATE_BLOCK@ 1; then
      echo "treeflash: boot counted"
    else
      echo "treeflash: could not write the boot count at block @STATE_BLOCK@"
    fi
  fi
  if test ${treeflash_tries} -gt ${treeflash_bootlimit}; then
    setenv treeflash_state rollback
    setenv boot_entry 2
    echo "treeflash: the current deployment failed ${treeflash_bootlimit} tries; rolling back"
  else
    setenv treeflash_state trial
    echo "treeflash: trial boot ${treeflash_tries} of ${treeflash_bootlimit} of the current deployment"
  fi
fi
